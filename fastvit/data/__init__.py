"""The data side of the bulk jobs and the server (DESIGN.md section 8): decode (bytes -> uint8
pixels with the checkpoint's geometry) and batches (uint8 batches to the device, overlapped)."""
