-- Argo CD health of a keelson.dev TrainingJob (resource.customizations.health.keelson.dev_TrainingJob).
-- Progressing until the operator has observed the current generation; Healthy when Ready is True
-- (every worker runs, or the job succeeded); Degraded when the job failed (Failed condition True),
-- its spec cannot be built (Created condition False) or a worker needs a person (bad image, crash
-- loop); Suspended while spec.suspend is true (a queue such as Kueue holds it); Progressing
-- otherwise.
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

-- Container waiting reasons that need a person (crates/keelson-operator/src/podstatus.rs).
local stuck = {
  ImagePullBackOff = true,
  ErrImagePull = true,
  InvalidImageName = true,
  CrashLoopBackOff = true,
  CreateContainerConfigError = true,
  CreateContainerError = true,
  RunContainerError = true,
}

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
local failed = condition("Failed")
if obj.status.phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  hs.message = describe(failed, describe(ready, "The job failed"))
  return hs
end
local created = condition("Created")
if created ~= nil and created.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(created, "The job's spec cannot be reconciled")
  return hs
end
if ready ~= nil and stuck[ready.reason] then
  hs.status = "Degraded"
  hs.message = describe(ready, "A worker needs attention")
  return hs
end
if (obj.spec ~= nil and obj.spec.suspend == true) or obj.status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = describe(condition("Suspended"), "The job is suspended")
  return hs
end
hs.status = "Progressing"
hs.message = describe(ready, "Waiting for the workers to run")
return hs
