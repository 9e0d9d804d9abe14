"""vlmpool.controller"""
