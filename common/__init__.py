"""Shared at the bottom: languages, fonts and charts, the consoles' web kit, how model arrays travel
(packing, compression), the allow-list of approved apps, hospital keys. Imports no other aseanfl package."""
