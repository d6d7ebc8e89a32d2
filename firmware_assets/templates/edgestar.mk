# {{NAME}}: sources `edgestar firmware` generated, for your Makefile. Add TFLite Micro's sources
# (or its prebuilt library) and include paths, with the same compile flags TFLM was built with
# (for a standalone tree: `make print-flags`; mismatched TF_LITE_STATIC_MEMORY/CMSIS_NN defines
# break silently).
EDGESTAR_DIR ?= $(dir $(lastword $(MAKEFILE_LIST)))
EDGESTAR_SRCS := $(EDGESTAR_DIR)main.cc $(EDGESTAR_DIR){{NAME}}_model_data.cc
EDGESTAR_INCLUDES := -I$(EDGESTAR_DIR)
# Flash: {{MODEL_BYTES}} B of model data. RAM: {{ARENA_RESERVE}} B of tensor arena (measured {{ARENA_MEASURED}} B).
