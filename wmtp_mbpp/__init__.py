"""MBPP (Austin et al. 2021, CC BY 4.0) as the kit ships it: JSON files only, no code.

A config names it `pkg:wmtp_mbpp` (this folder, installed or in a checkout); see README.md here.
"""
