//! Prompt weights as A1111 and ComfyUI read them, against their own parsers' output.
