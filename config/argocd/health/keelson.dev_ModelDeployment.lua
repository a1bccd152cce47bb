-- Argo CD health of a keelson.dev ModelDeployment
-- (resource.customizations.health.keelson.dev_ModelDeployment).
-- Progressing until the operator has observed the current generation; Healthy when Ready is True;
-- Degraded when the Progressing condition is False for any reason but a finished rollout (a
-- Deployment past its progress deadline, a spec the operator cannot build, the Gateway API
-- missing) or a Gateway refuses the HTTPRoute or GRPCRoute; Progressing otherwise.
local hs = {}

local function condition(type)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function describe(c, default)
  if c == nil then
    return default
  end
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

-- Reasons of a Progressing condition that is False because the rollout is done.
local done = { WeightsApplied = true, RolloutComplete = true }
-- Ready reasons that need a person although the rollout is not stuck.
local refused = { RouteNotAccepted = true, RouteRefsNotResolved = true }

if obj.status == nil or obj.status.observedGeneration == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. obj.metadata.generation
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready, "Ready")
  return hs
end
local progressing = condition("Progressing")
if progressing ~= nil and progressing.status == "False" and not done[progressing.reason] then
  hs.status = "Degraded"
  hs.message = describe(progressing, "The rollout is stuck")
  return hs
end
if ready ~= nil and refused[ready.reason] then
  hs.status = "Degraded"
  hs.message = describe(ready, "The HTTPRoute or GRPCRoute was refused")
  return hs
end
hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the variants to become ready")
return hs
