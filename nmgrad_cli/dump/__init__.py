"""The HDF5 dump of neural gradients: schema, writer and streaming reader (docs/dump-format.md)."""

from .reader import DumpReader, LayerInfo, Record
from .schema import SCHEMA_NAME, SCHEMA_VERSION
from .writer import DumpWriter

__all__ = ["SCHEMA_NAME", "SCHEMA_VERSION", "DumpReader", "DumpWriter", "LayerInfo", "Record"]
