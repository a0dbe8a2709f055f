"""Triton kernels (GPU, or CPU through the Triton interpreter with TRITON_INTERPRET=1).

Import from the submodule: ``from resnet_kernels.triton.conv_bn_act import conv_bn_act``.
Nothing is re-exported here on purpose: binding the function ``conv_bn_act`` on
this package would shadow the submodule of the same name, so
``import resnet_kernels.triton.conv_bn_act as m`` would yield the function.
Importing this package does not import triton.
"""
