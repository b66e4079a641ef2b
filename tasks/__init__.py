"""Task modules: one file per application, each a ZOModule subclass with its LightningDataModule(s)."""
