"""vlmpool.manifests"""
