"""Finding AVX code in a built library by disassembly (objdump), for the check that the AVX2
kernel table's code stays in it (docs/design.md §3): tests/test_extension.py runs it on the
installed extension, tests/test_sanitizers.py on the -O1 sanitizer build."""
import re
import subprocess


def functions_using_vex(library):
    """{function name: count} of the functions in ``library`` whose disassembly has a VEX-encoded
    (AVX, AVX2, FMA) instruction or names a ymm register."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], capture_output=True,
                             text=True, check=True).stdout
    found, function = {}, None
    for line in listing.splitlines():
        start = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if start:
            function = start.group(1)
        elif function and ("%ymm" in line or re.search(r"\tv[a-z]", line)):
            found[function] = found.get(function, 0) + 1
    return found


AVX2_ONLY_NAME = re.compile(r"::avx2::|\bmhgd_avx2::")


def outside_the_avx2_table(vex):
    """The function names in ``vex`` that another translation unit could also emit."""
    return sorted(name for name in vex if not AVX2_ONLY_NAME.search(name))
