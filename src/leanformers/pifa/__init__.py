"""MPIFA: Pivoting Factorization (PIFA) layers and the M reconstruction for post-training compression."""
