"""The gallery: identities pooled from embeddings and searched exactly or with FAISS (:mod:`.index`) or in a
vector database, Milvus or Qdrant (:mod:`.database`); the gallery folder layout and exact top-k
(:mod:`.search`). Task-neutral: it stores vectors, whatever made them.
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> the module that defines it, imported the first time the name is read
_EXPORTS = {
    "DatabaseGallery": ".database",
    "open_gallery": ".database",
    "GalleryIndex": ".index",
    "enrol_gallery": ".index",
    "enrol_gallery_report": ".index",
    "image_digest": ".index",
    "GalleryIndexError": ".search",
    "SearchHit": ".search",
    "exact_top_k": ".search",
    "gallery_images": ".search",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "DatabaseGallery",
    "GalleryIndex",
    "GalleryIndexError",
    "SearchHit",
    "enrol_gallery",
    "enrol_gallery_report",
    "exact_top_k",
    "gallery_images",
    "image_digest",
    "open_gallery",
]
