"""vlmpool.proxy"""
