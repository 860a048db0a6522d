"""Lab trials on Flower's Deployment Engine: prepare a lab's keys, and rehearse a trial on this machine."""
