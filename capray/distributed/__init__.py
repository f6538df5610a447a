"""Spreading one group's λ-candidate scoring over several actors (results equal local scoring)."""
