"""The expert cache: the device-free cache model (every rule), the policies and victim ranking,
and what the device adds (slot tensors, copy streams, slot tables)."""
