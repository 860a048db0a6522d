"""Device side: the Flower ClientApp and the mods that clip, noise and mask a device's update."""
