"""Lion on real BatchNorm convnets: measured against the prediction."""
