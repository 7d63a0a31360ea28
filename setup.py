"""txregistry: a Docker/OCI registry pull-through cache on Twisted."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "txregistry" / "__init__.py").read_text())[
    1
]

setup(
    name="txregistry",
    version=VERSION,
    description="A Docker/OCI registry pull-through cache appliance, on Twisted",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # "twisted.plugins" has no __init__.py: it is Twisted's plugin namespace,
    # and shipping one would replace Twisted's own.
    packages=[*find_packages(include=["txregistry", "txregistry.*"]), "twisted.plugins"],
    package_data={"twisted.plugins": ["txregistry_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7.0",
        "treq>=24.9.1",
        "service-identity>=24.1.0",
        "pyopenssl>=24.2.1",
        "diskcache>=5.6.3",
        # /metrics in the Prometheus format.
        "prometheus-client>=0.20",
        # Imported at runtime for certificates and keys (pyOpenSSL's own
        # X509 and PKey are deprecated).
        "cryptography>=42",
        # push_users_file: checking htpasswd -B (bcrypt) hashes.
        "bcrypt>=4.1",
        # The S3 backend's SigV4 signing and endpoint rules only; treq does
        # the I/O (see the README's fleet section for why).
        "botocore>=1.34",
    ],
    entry_points={"console_scripts": ["txregistry = txregistry.cli.main:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
        ],
        # Lint and types, run by .ci/run; pinned, so that a new release of a
        # checker cannot turn CI red by itself.
        "dev": ["mypy==2.4.1", "mypy-zope==1.0.17", "ruff==0.17.6"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Software Distribution",
    ],
)
