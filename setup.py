from setuptools import setup

setup(cffi_modules=["native/copier_build.py:ffibuilder"])
