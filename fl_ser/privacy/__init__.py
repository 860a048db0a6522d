"""Privacy: DP accounting (sample-level per device, user-level per federation) and the device's privacy boundary."""
