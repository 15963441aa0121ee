package cli

import (
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/onebox-project/onebox/agent"
)

// balanceCommands are the balancing verbs (issue 4): drain, uncordon. Stub.
func balanceCommands() []*cobra.Command { return nil }

// balanceAgentFlags registers the agent's balancer flags on f (values in
// cfg) and returns a func that copies the flags the user set into final.
func balanceAgentFlags(_ *pflag.FlagSet, _ *agent.Config) func(final *agent.Config) {
	return func(*agent.Config) {}
}
