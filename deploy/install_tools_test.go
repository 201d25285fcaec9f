package deploy

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestInstallToolsKeepsServicesOff runs scripts/install-tools.sh on a PATH
// where none of the tools exist and apt-get, sudo and systemctl are fakes
// that record what they were asked: apt-get installs while a policy-rc.d
// denies every service start, the prometheus service is disabled and
// stopped afterwards, and the policy file is gone at the end.
func TestInstallToolsKeepsServicesOff(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	work := t.TempDir()
	policy := filepath.Join(work, "policy-rc.d")
	log := filepath.Join(work, "calls.log")
	for _, name := range []string{"bash", "env", "cat", "rm", "chmod", "tee", "printf"} {
		p, err := exec.LookPath(name)
		if err != nil {
			continue // printf is a bash builtin
		}
		require.NoError(t, os.Symlink(p, filepath.Join(bin, name)))
	}
	// O_EXCL: a fake never writes through a symlink to a real tool.
	fake := func(name, body string) {
		f, err := os.OpenFile(filepath.Join(bin, name), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
		require.NoError(t, err)
		_, err = f.WriteString("#!" + filepath.Join(bin, "bash") + "\n" + body)
		require.NoError(t, err)
		require.NoError(t, f.Close())
	}
	// A user that is not root goes through sudo.
	fake("id", `echo 1000`+"\n")
	fake("sudo", `"$@"`+"\n")
	fake("apt-get", `
if [[ $1 == install ]]; then
	policy=absent
	[[ -x "$VAULTFLEET_POLICY_RC_D" ]] && policy=$("$VAULTFLEET_POLICY_RC_D" prometheus start; echo $?)
	echo "apt-get $* policy=${policy}" >> "$CALLS"
else
	echo "apt-get $*" >> "$CALLS"
fi
`)
	fake("systemctl", `echo "systemctl $*" >> "$CALLS"`+"\n")

	cmd := exec.Command(filepath.Join("..", "scripts", "install-tools.sh"))
	cmd.Env = []string{"PATH=" + bin, "VAULTFLEET_POLICY_RC_D=" + policy, "CALLS=" + log}
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	b, err := os.ReadFile(log)
	require.NoError(t, err)
	calls := strings.Split(strings.TrimSpace(string(b)), "\n")
	require.Equal(t, []string{
		"apt-get update -qq",
		"apt-get install -y -qq --no-install-recommends redis-server redis-tools prometheus docker-compose chromium policy=101",
		"systemctl disable --now prometheus",
	}, calls, "install while no service may start (policy-rc.d answers 101), then disable prometheus")
	require.NoFileExists(t, policy, "the policy file is removed afterwards")

	// A policy-rc.d the machine already has is left alone.
	require.NoError(t, os.WriteFile(policy, []byte("#!/bin/sh\nexit 0\n"), 0o755))
	require.NoError(t, os.Remove(log))
	cmd = exec.Command(filepath.Join("..", "scripts", "install-tools.sh"))
	cmd.Env = []string{"PATH=" + bin, "VAULTFLEET_POLICY_RC_D=" + policy, "CALLS=" + log}
	out, err = cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	kept, err := os.ReadFile(policy)
	require.NoError(t, err)
	require.Equal(t, "#!/bin/sh\nexit 0\n", string(kept))
}
