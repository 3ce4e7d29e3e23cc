from setuptools import find_packages, setup

setup(
    name="minivid",
    version="0.1.0",
    description="From-scratch PyTorch reference implementation of COVE, EI², TCVE, I2VEdit and the models they stand on",
    python_requires=">=3.10",
    packages=find_packages(include=["minivid", "minivid.*"]) + ["minivid.kernels"],
    package_dir={"minivid.kernels": "kernels"},
    package_data={"minivid": ["data/*", "configs/*.yaml"]},
    install_requires=[
        "torch==2.13.0",
        "safetensors",
        "tokenizers",
        "numpy",
        "imageio-ffmpeg",
        "tqdm",
        "triton",
    ],
    extras_require={
        "test": ["pytest", "diffusers", "transformers"],
        "parity": ["diffusers", "transformers"],          # `minivid parity` (minivid.parity imports them lazily)
    },
    entry_points={"console_scripts": ["minivid=minivid.cli:main"]},
)
