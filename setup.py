"""pip install of the ROS-free pose_estimator library and CLI.

Metadata lives in setup.cfg. The ROS package (messages, node, launch files) is
built with colcon from package.xml / CMakeLists.txt; see `make setup`.
"""

from setuptools import setup

setup()
