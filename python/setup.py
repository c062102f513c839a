"""Builds the bottomless wheel: the Python module plus the loadable extension.

scripts/package.sh runs it offline with Debian's python3-setuptools and
python3-wheel, keeping build files out of the tree:

    BOTTOMLESS_EXTENSION=build/bottomless.so python3 setup.py egg_info --egg-base T \\
        build --build-base T/build bdist_wheel --bdist-dir T/bdist --dist-dir dist

The wheel is tagged py3-none-<platform> (e.g. linux_x86_64): the extension is
machine code for one platform but calls no Python C API, so any Python 3
whose sqlite3 can load extensions can use it.
"""

import os
import re
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution
from wheel.bdist_wheel import bdist_wheel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def project_version():
    with open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8") as f:
        m = re.search(r"project\(bottomless VERSION ([0-9.]+)", f.read())
    if not m:
        raise SystemExit("setup.py: no 'project(bottomless VERSION x.y.z)' in CMakeLists.txt")
    return m.group(1)


VERSION = project_version()


def extension_path():
    path = os.environ.get("BOTTOMLESS_EXTENSION") or os.path.join(ROOT, "build", "bottomless.so")
    if not os.path.isfile(path):
        raise SystemExit(
            "setup.py: the loadable extension %s does not exist: build it "
            "(cmake --build build --target bottomless_ext) or set BOTTOMLESS_EXTENSION" % path
        )
    return path


class BuildPy(build_py):
    """Copies the module, then the extension next to it, and stamps the version."""

    def run(self):
        super().run()
        pkg = os.path.join(self.build_lib, "bottomless")
        shutil.copyfile(extension_path(), os.path.join(pkg, "bottomless.so"))
        os.chmod(os.path.join(pkg, "bottomless.so"), 0o755)
        init = os.path.join(pkg, "__init__.py")
        with open(init, encoding="utf-8") as f:
            text = f.read()
        with open(init, "w", encoding="utf-8") as f:
            f.write(text.replace("@VERSION@", VERSION))


class BinaryDistribution(Distribution):
    """Machine code inside: installed into platlib, a platform wheel."""

    def has_ext_modules(self):
        return True


class BdistWheel(bdist_wheel):
    def get_tag(self):
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    name="bottomless",
    version=VERSION,
    description="SQLite VFS that continuously replicates a database to S3 (loadable extension for sqlite3)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=["bottomless"],
    python_requires=">=3.7",
    cmdclass={"build_py": BuildPy, "bdist_wheel": BdistWheel},
    distclass=BinaryDistribution,
    zip_safe=False,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Database",
    ],
)
