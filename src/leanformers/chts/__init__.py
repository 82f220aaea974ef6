"""CHTs / CHTss: Cannistraci-Hebb soft-rule dynamic sparse training."""
