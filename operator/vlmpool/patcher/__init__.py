"""vlmpool.patcher"""
