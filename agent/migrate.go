package agent

import (
	"context"
	"errors"
)

// migrate moves the running process gid to node target (by CRIU). reason
// says why ("user", "balance", "drain"), shown in 'onebox ps'. Stub; the
// migration slice fills it in.
func (p *procState) migrate(_ context.Context, gid, target, reason string) error {
	return errors.New("migration is not available yet")
}
