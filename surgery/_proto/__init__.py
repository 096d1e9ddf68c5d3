"""Caffe's protobuf schema, generated from protos/caffe.proto by tools/gen_proto.py."""

from . import caffe_pb2

__all__ = ["caffe_pb2"]
