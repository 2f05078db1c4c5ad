"""What runs on each edge device: the Flower ClientApp and the device's local work."""
