"""streamvz: streaming video assistant with VisionZip-compressed frames in a rolling KV cache."""
from .errors import StreamError
from .compress import VisionZip
from .dropin import remove_visionzip, visionzip
from .engine import Engine

__version__ = "0.1.0"
__all__ = ["Engine", "VisionZip", "StreamError", "visionzip", "remove_visionzip", "__version__"]
