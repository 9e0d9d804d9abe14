"""vlmpool.sim"""
