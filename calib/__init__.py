"""Shipped data: the CIFAR-10 demo set. Installed as the package ``edgestar._demo_data``.

setup.cfg maps this folder onto that package so that a wheel carries the demo images, their
file list and README.md (provenance and license). edgestar finds the images with
``edgestar.data.images.demo_split``. Nothing here is meant to be imported for code.
"""
