"""Ensembling: k-means centroids of the ensemble's predictions and DAKL kernel regression."""
