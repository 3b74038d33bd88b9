"""Turning chat messages, images and videos into model inputs, and token ids back into text."""
