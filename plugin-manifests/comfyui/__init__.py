"""sdti for ComfyUI: train, convert and inspect Textual Inversion embeddings natively.

The node classes are in nodes.py, checked against sdti.plugin.json by tests/test_nodes.py;
the work is done by the sdti library (libsdti), found through SDTI_LIBRARY, next to this
file, in the installed sdti Python package (requirements.txt), or in the repository's
target folder, in that order (sdti_lib.py).
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# ComfyUI serves the .js files here to its frontend: web/sdti.js shows what Train and
# Convert report when they finish.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
