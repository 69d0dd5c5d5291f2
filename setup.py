"""Packaging beyond what pyproject.toml can say: configs/ stays at the repository's top level (the project's layout),
and ships inside the wheel as kd/configs, so an installed kd finds its configs by name (kd.paths.resolve_config)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["kd", "kd.*"]) + ["kd.configs", "kd.configs.accelerate"],
    package_dir={"kd.configs": "configs"},
    package_data={"kd.configs": ["*.yaml"], "kd.configs.accelerate": ["*.yaml"]},
)
