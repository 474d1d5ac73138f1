"""A real Linux guest (Debian cloud kernel under QEMU) on fvd images."""
