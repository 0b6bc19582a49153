"""Pieces shared by every layer: the one wire codec and the base of every error tree."""
