//! Trainer parameters revision 3: prediction type and clip skip from a C host.
