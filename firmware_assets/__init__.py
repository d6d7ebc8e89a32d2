"""Shipped firmware assets: the board table (boards.toml). Installed as ``edgestar._firmware_assets``.

setup.cfg maps this folder onto that package so that a wheel carries the table;
``edgestar.deploy.boards.load_boards`` reads it. Nothing here is meant to be imported for code.
"""
