"""vlmpool.kube"""
