"""Pure tests, in process: maths, file formats, units, conf tools, the splitter, tc lines, pure parts of the backends and the controller."""
