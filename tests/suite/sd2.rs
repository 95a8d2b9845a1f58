//! SD 2.x: OpenCLIP ViT-H conditioning, the SD 2.x UNet, training, against the
//! reference fixtures of tests/reference/make_tiny_sd2.py.
