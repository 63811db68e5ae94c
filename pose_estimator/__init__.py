"""pose_estimator: camera-based end-effector pose estimation for robot arms.

Everything in this package except :mod:`pose_estimator.ros` is plain
numpy/torch and imports without ROS. The generated ROS message modules
(``pose_estimator.msg``) live in the colcon install tree; extending
``__path__`` lets them be found beside a source checkout or a pip install.
"""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

__version__ = "0.1.0"
