"""Routing decisions as plain functions: reasoning depth, replica ranking, region order."""
