"""vlmpool.localcluster"""
