"""The gallery index: identities pooled from embeddings, searched exactly or with FAISS (:mod:`.index`)."""
