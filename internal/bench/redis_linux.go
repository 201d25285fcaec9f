package bench

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the private redis-server exit when the bench does,
// even when it is killed (SIGKILL, or SIGPIPE into a closed pipe) before
// it can stop the server itself.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
