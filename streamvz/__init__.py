"""streamvz: streaming video assistant with VisionZip-compressed frames in a rolling KV cache."""
from .errors import StreamError
from .engine import Engine
from .visionzip import VisionZip

__version__ = "0.1.0"
__all__ = ["Engine", "VisionZip", "StreamError", "__version__"]
